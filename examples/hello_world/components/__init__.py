"""The hello-world skeleton's services: each file is one service a user would write."""
