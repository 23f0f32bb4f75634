"""Scale-out on Ray: Ray Serve replicas of the OpenAI server (`ray_serve`), a sweep's cells as Ray
tasks (`tasks`), and the one place a Ray runtime is started or joined (`cluster`). Ray is an optional
dependency (`pip install 'kvlab[ray]'`); nothing here imports it until called."""
