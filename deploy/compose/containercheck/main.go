// containercheck reads docker-compose.yml, the Dockerfile and .dockerignore with the
// libraries Docker itself uses, for tests/unit/test_containers.py on a machine without a
// Docker engine (or the compose plugin):
//
//	containercheck compose FILE         the project as `docker compose config` resolves it
//	                                    (schema, interpolation, consistency), as JSON
//	containercheck dockerfile FILE      stages and instructions as BuildKit parses them,
//	                                    with BuildKit's lint warnings, as JSON
//	containercheck dockerignore DIR     reads paths (relative to DIR) on stdin, prints
//	                                    the ones DIR/.dockerignore leaves in the context
//
// Exit 1 with the library's message when a file is invalid.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	"github.com/moby/buildkit/frontend/dockerfile/linter"
	"github.com/moby/buildkit/frontend/dockerfile/parser"
	"github.com/moby/patternmatcher"
	"github.com/moby/patternmatcher/ignorefile"
)

func main() {
	if len(os.Args) != 3 {
		fail(fmt.Errorf("usage: containercheck compose|dockerfile|dockerignore PATH"))
	}
	var err error
	switch os.Args[1] {
	case "compose":
		err = compose(os.Args[2])
	case "dockerfile":
		err = dockerfile(os.Args[2])
	case "dockerignore":
		err = dockerignore(os.Args[2])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}

func emit(value any) error {
	out := json.NewEncoder(os.Stdout)
	out.SetIndent("", "  ")
	return out.Encode(value)
}

func compose(file string) error {
	options, err := cli.NewProjectOptions(
		[]string{file},
		cli.WithWorkingDirectory(filepath.Dir(file)),
		cli.WithOsEnv,
		cli.WithDotEnv,
		cli.WithConsistency(true),
		cli.WithResolvedPaths(false),
	)
	if err != nil {
		return err
	}
	project, err := options.LoadProject(context.Background())
	if err != nil {
		return err
	}
	data, err := project.MarshalJSON()
	if err != nil {
		return err
	}
	_, err = os.Stdout.Write(data)
	return err
}

type command struct {
	Name     string            `json:"name"`
	Original string            `json:"original"`
	Line     int               `json:"line"`
	From     string            `json:"from,omitempty"`
	Sources  []string          `json:"sources,omitempty"`
	Dest     string            `json:"dest,omitempty"`
	Args     []string          `json:"args,omitempty"`
	Shell    bool              `json:"shell,omitempty"`
	Env      map[string]string `json:"env,omitempty"`
	Mounts   []mount           `json:"mounts,omitempty"`
	Value    string            `json:"value,omitempty"`
}

type mount struct {
	Type   string `json:"type"`
	From   string `json:"from,omitempty"`
	Source string `json:"source,omitempty"`
	Target string `json:"target"`
}

type stage struct {
	Name     string    `json:"name"`
	Base     string    `json:"base"`
	Line     int       `json:"line"`
	Commands []command `json:"commands"`
}

type warning struct {
	Rule    string `json:"rule"`
	Message string `json:"message"`
	Line    int    `json:"line"`
}

func dockerfile(file string) error {
	f, err := os.Open(file)
	if err != nil {
		return err
	}
	defer f.Close()
	result, err := parser.Parse(f)
	if err != nil {
		return err
	}
	warnings := []warning{}
	for _, w := range result.Warnings {
		warnings = append(warnings, warning{Rule: "parser", Message: w.Short, Line: w.Location.Start.Line})
	}
	lint := linter.New(&linter.Config{
		Warn: func(rule, description, url, message string, location []parser.Range) {
			line := 0
			if len(location) > 0 {
				line = location[0].Start.Line
			}
			warnings = append(warnings, warning{Rule: rule, Message: message, Line: line})
		},
	})
	stages, metaArgs, err := instructions.Parse(result.AST, lint)
	if err != nil {
		return err
	}
	args := map[string]string{}
	for _, arg := range metaArgs {
		for _, kv := range arg.Args {
			args[kv.Key] = kv.ValueString()
		}
	}
	identity := func(word string) (string, error) { return word, nil }
	out := []stage{}
	for _, s := range stages {
		st := stage{Name: s.Name, Base: s.BaseName, Commands: []command{}}
		if len(s.Location) > 0 {
			st.Line = s.Location[0].Start.Line
		}
		for _, raw := range s.Commands {
			c := command{Name: raw.Name(), Original: fmt.Sprint(raw)}
			if located, ok := raw.(interface{ Location() []parser.Range }); ok && len(located.Location()) > 0 {
				c.Line = located.Location()[0].Start.Line
			}
			switch cmd := raw.(type) {
			case *instructions.CopyCommand:
				c.From, c.Sources, c.Dest = cmd.From, cmd.SourcePaths, cmd.DestPath
			case *instructions.RunCommand:
				if err := cmd.Expand(identity); err != nil {
					return err
				}
				c.Args, c.Shell = cmd.CmdLine, cmd.PrependShell
				for _, m := range instructions.GetMounts(cmd) {
					c.Mounts = append(c.Mounts, mount{Type: string(m.Type), From: m.From, Source: m.Source, Target: m.Target})
				}
			case *instructions.CmdCommand:
				c.Args, c.Shell = cmd.CmdLine, cmd.PrependShell
			case *instructions.EntrypointCommand:
				c.Args, c.Shell = cmd.CmdLine, cmd.PrependShell
			case *instructions.HealthCheckCommand:
				c.Args = cmd.Health.Test
			case *instructions.EnvCommand:
				c.Env = map[string]string{}
				for _, kv := range cmd.Env {
					c.Env[kv.Key] = kv.Value
				}
			case *instructions.ArgCommand:
				c.Env = map[string]string{}
				for _, kv := range cmd.Args {
					c.Env[kv.Key] = kv.ValueString()
				}
			case *instructions.UserCommand:
				c.Value = cmd.User
			case *instructions.WorkdirCommand:
				c.Value = cmd.Path
			case *instructions.ExposeCommand:
				c.Args = cmd.Ports
			}
			st.Commands = append(st.Commands, c)
		}
		out = append(out, st)
	}
	return emit(map[string]any{"args": args, "stages": out, "warnings": warnings})
}

func dockerignore(dir string) error {
	patterns := []string{}
	if f, err := os.Open(filepath.Join(dir, ".dockerignore")); err == nil {
		patterns, err = ignorefile.ReadAll(f)
		f.Close()
		if err != nil {
			return err
		}
	}
	matcher, err := patternmatcher.New(patterns)
	if err != nil {
		return err
	}
	scanner := bufio.NewScanner(os.Stdin)
	for scanner.Scan() {
		path := scanner.Text()
		excluded, err := matcher.MatchesOrParentMatches(filepath.ToSlash(path))
		if err != nil {
			return err
		}
		if !excluded {
			fmt.Println(path)
		}
	}
	return scanner.Err()
}
