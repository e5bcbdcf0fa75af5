"""The ground floor: errors, logging, distributed helpers, RNG, command-line plumbing and file
I/O (atomic writes, output checks, the iopath path manager). Imports nothing else of metric."""
