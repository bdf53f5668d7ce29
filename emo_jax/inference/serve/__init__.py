"""Serving expert subsets: one server, many tasks, each routed into its own experts.

* `bank`: the resident experts (the union of the registered subsets plus the shared ones),
  held as a compact bank and an index map; registering loads only the missing experts from the
  checkpoint, deleting frees them.
* `engine`: continuous batching over a fixed number of decode slots with one KV cache; every
  row carries its own routing mask, so requests on different subsets share one compiled step.
* `app`: the OpenAI-compatible HTTP layer (FastAPI) over the engine.

README.md, "Serve expert subsets", shows how to run it.
"""
