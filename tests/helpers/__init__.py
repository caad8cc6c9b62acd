"""Helpers the tests import (as tests.helpers.*) or run inside their namespaces; no tests here.

- skips: module-level skips naming what is missing (namespaces, libbpf, BPF objects, NFQUEUE).
- kernel_agent: a KernelDatapath in the test process, watching one test host.
- traffic: the demo service on a host, requests from inside hosts, traceparent lookups.
- fallback_fakes: a socket-owner stand-in and scapy-built TCP connections (unit tests).
- parity_harness: both datapaths on the same topology, for the parity and interop tests;
  parity_apps, interop_apps, tls_app: programs those tests run inside their hosts.

The OTLP receiver the tests use is the benchmarks' one, bench/otlp_receiver.py.
"""
