"""The foundation every layer stands on: errors, crash-safe files, locks, the process's place in the
distributed world, the stage list (`pipeline`), GGUF and remote-code checks, the CPU allocator.
Nothing here imports another SafeAlign layer."""
