"""obi-py benchmarks: `python3 -m bench` (or `obi bench`) from the repository root.

See bench/README.md. Modules: harness (topology, arms x repetitions, load phases,
measurements), arms (what runs next to the server), report (JSON, Markdown, charts),
codec_micro (codec and span-pipeline micro-benchmarks), and the helper processes
httpserver, loadgen, nfq_noop, otlp_receiver (also the tests' OTLP receiver).
"""
