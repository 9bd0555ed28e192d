"""Cluster deployment: Ray pools (Kubernetes lives in deploy/helm)."""
