"""Cluster deployment: drafter, verifier and OpenAI-gateway pools on Ray (Kubernetes lives in deploy/helm).

Importing this package does not import Ray; `up` and `connect` do.
"""

from sparsespec.deploy.api import Deployment, connect, up
from sparsespec.deploy.config import DeployConfig, PoolConfig, load_config

__all__ = ["DeployConfig", "Deployment", "PoolConfig", "connect", "load_config", "up"]
