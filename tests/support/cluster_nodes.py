"""Two Ray nodes on 127.0.0.1 for tests/test_cluster.py, built with ray.cluster_utils.Cluster as Ray's own tests
build them (a head with one CPU, a worker node with one CPU, every server on loopback). Prints {"address": GCS}
as one JSON line, then obeys lines on stdin: "kill-worker" (the worker node dies at once, as a lost machine does)
and "quit" (or the end of stdin)."""
import json
import os
import sys

# Ray's single-node networking: every node's address is 127.0.0.1 and its servers listen there only.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

from ray.cluster_utils import Cluster  # noqa: E402  (after the environment it reads)

cluster = Cluster(initialize_head=True, connect=False,
                  head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
cluster.wait_for_nodes()
print(json.dumps({"address": cluster.address}), flush=True)
try:
    for line in sys.stdin:
        if line.strip() == "kill-worker":
            cluster.remove_node(worker, allow_graceful=False)
            print("killed", flush=True)
        elif line.strip() == "quit":
            break
finally:
    cluster.shutdown()
