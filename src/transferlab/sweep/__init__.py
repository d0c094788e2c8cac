"""A sweep: its config, the plan of runs, the executors, the ledger store, choosing and testing once, and the coordinator."""
