"""`kvlab bench --technique serving`: concurrent streaming clients over real HTTP against `kvlab serve`
(a subprocess) and, optionally, against 1..N Ray Serve replicas of the same app. The paged engine's
own bench, without HTTP, is kvlab.bench.serving (`--technique paged`)."""
