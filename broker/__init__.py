"""broker package (see DESIGN.md §2; filled by the distributed-runtime issue)."""
