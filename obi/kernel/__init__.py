"""Kernel fast path: libbpf binding, BPF loader, attachments, feature probes."""
