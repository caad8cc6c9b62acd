"""Demo scaffolding, also used by the tests and the benchmarks.

- `scenario`: `obi demo`, three hosts, an agent per instrumented host, traces printed and checked.
- `app`: the small uninstrumented HTTP service the demo, tests and benchmarks trace
  (`python3 -m obi.demo.app serve`).
- `topology`: throw-away hosts in network namespaces on one bridge (198.18.0.0/15).
"""
