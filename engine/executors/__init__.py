"""Executor implementations (eager, graphed, CPU flat, decode lookahead) and the factory that picks one."""
