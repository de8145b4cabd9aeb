"""Pulumi programs that put a servegrid graph somewhere: ``aws/`` (GPU nodes for the Ansible
roles) and ``kubernetes/`` (the graph as Deployments). Both read the graph config with the
runtime's own loader (``stacks.graph``)."""
