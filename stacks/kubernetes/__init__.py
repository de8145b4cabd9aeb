"""The Kubernetes stack: the graph config's services as Deployments beside etcd and NATS."""
