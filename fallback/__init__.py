"""Userspace datapath for kernels without bpf_loop: iptables NFQUEUE + Python."""
