"""The AWS stack: a VPC, a cluster placement group and nodes for the Ansible roles."""
