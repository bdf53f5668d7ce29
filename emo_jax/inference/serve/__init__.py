"""Serving expert subsets: one server, many tasks, each routed into its own experts.

* `bank`: the resident experts (the union of the registered subsets plus the shared ones),
  held as a compact bank and an index map; registering loads only the missing experts from the
  checkpoint, deleting frees them.
* `engine`: continuous batching over a fixed number of decode slots with one KV cache; every
  row carries its own routing mask, so requests on different subsets share one compiled step
  (`inference.decode`, the steps `generate` drives too). It reports to each request with
  `Delta` and `Done` events.
* `app` (FastAPI, the serve extra): the OpenAI-compatible HTTP layer over the engine:
  `create_app`, the module-level `routes`, the request / response `schemas` (the OpenAPI
  contract) and the `server.Server` state they share; `protocol` holds the errors and chat
  templates, without FastAPI.

README.md, "Serve expert subsets", shows how to run it.
"""
