"""Running shard runs past one machine: Celery nodes for the throttle's placement, the Kubernetes run pod."""
