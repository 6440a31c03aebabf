"""What a caller uses to talk to a service of the mesh, kept beside the contract (the
protos) rather than inside the server's package: services meet over the wire only, so a
service imports another's client from here, never the other service."""
