"""What llmc needs from the machine it runs on: memory handed back to the OS, scratch files on disk,
and paths that are checked before they are read or written. A leaf: imports nothing else of llmc's
but compiler.errors, so every layer above can use it."""
