"""Distributed training modes: treeAggregate (driver-side optimizer) and barrier (all-reduce between tasks)."""
