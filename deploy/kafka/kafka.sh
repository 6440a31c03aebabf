#!/usr/bin/env bash
# A one-node Apache Kafka broker (KRaft, broker and controller in one JVM, loopback only)
# run straight from its Maven Central jars: no tarball, no ZooKeeper, no Docker.
#
#   kafka.sh install
#       Resolves the jars named by deploy/kafka/pom.xml into ${CLAWDBOT_KAFKA_HOME}/libs with Maven.
#       Skipped when ${CLAWDBOT_KAFKA_HOME}/.installed holds the pom's sha256; Maven's own cache
#       (~/.m2) makes a re-run after a pom change work offline for jars it already has.
#   kafka.sh installed
#       Exits 0 when the jars of the current pom are installed, 1 otherwise (no output).
#   kafka.sh format <data_dir> <port> <controller_port>
#       (Re)writes <data_dir>/server.properties for those loopback ports and, only when the
#       storage is not formatted yet, formats <data_dir>/logs with a random cluster id.
#       Idempotent: running it again (say, before every start) keeps the data.
#   kafka.sh start <data_dir>
#       Runs the broker in the foreground (exec: the broker's pid is this process's pid,
#       written to <data_dir>/broker.pid) so a supervisor can run it and stop it with
#       SIGTERM, on which Kafka shuts down cleanly. Logs WARN and worse (and its "Kafka
#       Server started" line) to stdout, one JSON object per line (deploy/kafka/log4j2.yaml).
#   kafka.sh stop <data_dir>
#       For a broker started detached by hand (nohup kafka.sh start DIR >DIR/broker.log 2>&1 &):
#       SIGTERMs the pid in <data_dir>/broker.pid and waits for it to exit (SIGKILL after
#       $CLAWDBOT_KAFKA_STOP_TIMEOUT seconds, default 60).
#
# Environment:
#   CLAWDBOT_KAFKA_HOME          where the jars go (default: <repo>/.tools/kafka)
#   CLAWDBOT_KAFKA_STOP_TIMEOUT  seconds `stop` waits before SIGKILL (default: 60)
#   JAVA_HOME                    the Java (17+) to use; default: java on PATH
#
# Needs Java 17+ and, for install only, Maven (scripts/setup.sh installs both).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
KAFKA_HOME=${CLAWDBOT_KAFKA_HOME:-$ROOT/.tools/kafka}
LIBS=$KAFKA_HOME/libs
STAMP=$KAFKA_HOME/.installed
POM=$HERE/pom.xml
LOG_CONFIG=$HERE/log4j2.yaml
JAVA=${JAVA_HOME:+$JAVA_HOME/bin/}java

say() { printf '[kafka] %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
}

pom_sha() { sha256sum "$POM" | cut -d' ' -f1; }

is_installed() {
  [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(pom_sha)" ] && compgen -G "$LIBS/kafka_2.13-*.jar" >/dev/null
}

require_installed() {
  is_installed || die "Kafka jars missing or stale in $LIBS: run 'bash $HERE/kafka.sh install' (make setup does)"
  command -v "$JAVA" >/dev/null || die "java not found: Kafka needs Java 17+ (make setup installs it)"
}

# An absolute path to an existing directory, created if needed: server.properties must
# not depend on the directory the broker is started from.
abs_dir() { mkdir -p "$1" && (cd "$1" && pwd); }
existing_dir() { [ -d "$1" ] || die "no such directory: $1"; (cd "$1" && pwd); }

check_port() {
  if ! [[ $1 =~ ^[0-9]+$ ]] || [ "$1" -lt 1 ] || [ "$1" -gt 65535 ]; then
    die "not a TCP port: '$1'"
  fi
}

cmd_install() {
  if is_installed; then
    say "up to date ($LIBS)"
    return 0
  fi
  command -v mvn >/dev/null || die "mvn not found: install Maven (make setup does)"
  mkdir -p "$KAFKA_HOME"
  say "resolving the broker's jars from Maven Central into $LIBS"
  local tmp
  tmp=$(mktemp -d "$KAFKA_HOME/libs.XXXXXX")
  # Into a fresh directory, then swapped in: a failed or interrupted run leaves the old
  # classpath (or none) rather than a mix of two versions.
  # Maven's output only on failure (quiet, it still prints stray colour codes).
  local out
  if ! out=$(mvn -q -B -f "$POM" dependency:copy-dependencies \
      -DoutputDirectory="$tmp" -DincludeScope=runtime 2>&1); then
    printf '%s\n' "$out" >&2
    rm -rf "$tmp"
    die "mvn could not resolve $POM"
  fi
  rm -rf "$LIBS"
  mv "$tmp" "$LIBS"
  pom_sha > "$STAMP"
  say "installed $(find "$LIBS" -name '*.jar' | wc -l) jars"
}

# Cluster ids are Kafka Uuids: 16 random bytes, URL-safe base64 without padding (what
# `kafka-storage.sh random-uuid` prints), made here to spare a JVM start. Like Kafka's
# Uuid.randomUuid, never one that starts with '-': the storage tool's argument parser
# would take it for an option (one format in 64 failed so).
random_cluster_id() {
  local id
  while :; do
    id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
    [[ $id == -* ]] || break
  done
  printf '%s\n' "$id"
}

write_server_properties() {
  local data_dir=$1 port=$2 controller_port=$3 tmp
  tmp=$(mktemp "$data_dir/server.properties.XXXXXX")
  cat > "$tmp" <<EOF
# Written by deploy/kafka/kafka.sh format; rewritten on every format, so edit the script.
process.roles=broker,controller
node.id=1
# A static one-voter quorum: the controller's address is not recorded in the metadata log
# (as it is with controller.quorum.bootstrap.servers and --standalone), so the ports may
# change between runs over the same data.
controller.quorum.voters=1@127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs=$data_dir/logs

# One broker: every replication factor is 1.
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Internal topics with fewer partitions than the default 50: far fewer files and a
# faster first consumer group on a small machine.
offsets.topic.num.partitions=8
transaction.state.log.num.partitions=8

# Services create their own topics (with their partition counts).
auto.create.topics.enable=false
num.partitions=1
group.initial.rebalance.delay.ms=0

# Sized for a developer machine: small segments and indexes, few threads, a small
# compaction buffer (the default 128 MiB would be a quarter of the heap).
log.segment.bytes=16777216
log.index.size.max.bytes=1048576
log.retention.hours=168
log.cleaner.dedupe.buffer.size=16777216
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
EOF
  mv "$tmp" "$data_dir/server.properties"
}

# JVM flags for the short-lived storage tool: a small heap, and no optimizing compiler
# (it would not pay off in a few seconds).
TOOL_JVM=(-Xms32m -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true)

cmd_format() {
  [ $# -eq 3 ] || usage
  check_port "$2"
  check_port "$3"
  [ "$2" != "$3" ] || die "the broker and controller ports must differ"
  require_installed
  local data_dir
  data_dir=$(abs_dir "$1")
  mkdir -p "$data_dir/logs"
  write_server_properties "$data_dir" "$2" "$3"
  if [ -f "$data_dir/logs/meta.properties" ]; then
    return 0
  fi
  # --ignore-formatted as well: should the check above ever miss, formatting again must
  # not wipe or fail on existing data.
  "$JAVA" "${TOOL_JVM[@]}" -Dlog4j2.configurationFile="$LOG_CONFIG" -cp "$LIBS/*" \
    kafka.tools.StorageTool format --ignore-formatted \
    --cluster-id "$(random_cluster_id)" --config "$data_dir/server.properties"
}

# The command line of a running pid, or nothing.
cmdline_of() { { tr '\0' ' ' < "/proc/$1/cmdline"; } 2>/dev/null || true; }

# The pid in <data_dir>/broker.pid when that process is alive and is a broker of this
# data_dir (not some later process that reused the pid); nothing otherwise.
live_broker_pid() {
  local data_dir=$1 pid
  [ -f "$data_dir/broker.pid" ] || return 0
  pid=$(cat "$data_dir/broker.pid")
  [[ $pid =~ ^[0-9]+$ ]] || return 0
  case $(cmdline_of "$pid") in
    *"kafka.Kafka $data_dir/server.properties"*) echo "$pid" ;;
  esac
}

cmd_start() {
  [ $# -eq 1 ] || usage
  require_installed
  local data_dir running
  data_dir=$(existing_dir "$1")
  if [ ! -f "$data_dir/server.properties" ] || [ ! -f "$data_dir/logs/meta.properties" ]; then
    die "$data_dir is not formatted: run 'kafka.sh format $1 <port> <controller_port>' first"
  fi
  running=$(live_broker_pid "$data_dir")
  [ -z "$running" ] || die "a broker already runs on $data_dir (pid $running)"
  # exec keeps this pid, so it is the broker's.
  echo $$ > "$data_dir/broker.pid"
  # Serial GC: on a small heap and two cores it costs less CPU and memory than G1.
  # -Dkafka.logs.dir: Kafka's own default for any file logging; ours logs to stdout only.
  exec "$JAVA" -Xms256m -Xmx512m -XX:+UseSerialGC -XX:+ExitOnOutOfMemoryError \
    -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$LOG_CONFIG" \
    -Dkafka.logs.dir="$data_dir" \
    -cp "$LIBS/*" kafka.Kafka "$data_dir/server.properties"
}

cmd_stop() {
  [ $# -eq 1 ] || usage
  local data_dir pid timeout waited=0
  data_dir=$(existing_dir "$1")
  timeout=${CLAWDBOT_KAFKA_STOP_TIMEOUT:-60}
  [[ $timeout =~ ^[0-9]+$ ]] || die "CLAWDBOT_KAFKA_STOP_TIMEOUT is not a number of seconds: '$timeout'"
  pid=$(live_broker_pid "$data_dir")
  if [ -z "$pid" ]; then
    rm -f "$data_dir/broker.pid"
    say "no broker running on $data_dir"
    return 0
  fi
  say "stopping the broker (pid $pid)"
  kill -TERM "$pid"
  # Tenths of a second: a clean shutdown takes a few seconds.
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$waited" -ge $((timeout * 10)) ]; then
      say "still running after ${timeout}s: SIGKILL (the next start recovers the logs)"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  rm -f "$data_dir/broker.pid"
  say "stopped"
}

[ $# -ge 1 ] || usage
command=$1
shift
case $command in
  install) [ $# -eq 0 ] || usage; cmd_install ;;
  installed) [ $# -eq 0 ] || usage; is_installed ;;
  format) cmd_format "$@" ;;
  start) cmd_start "$@" ;;
  stop) cmd_stop "$@" ;;
  -h|--help|help) usage ;;
  *) usage ;;
esac
