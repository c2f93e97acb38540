"""``fedpeft deploy``: the federation on Flower's Deployment Engine (a SuperLink and SuperNodes on loopback)."""

from fedpeft.deploy.launcher import Deployment, deploy

__all__ = ["Deployment", "deploy"]
