"""The kernel datapath: libbpf binding, BPF loader, attachments, ring reader, feature probes
(docs/architecture.md)."""
