"""Two Ray nodes on this machine, every server of both on 127.0.0.1: a cluster to try `igcam batch --address` and
`igcam serve --address` on before a real one (docs/deploying.md). Built with ray.cluster_utils.Cluster, the
mini-cluster Ray documents for testing, in Ray's single-node networking mode (`ray start` refuses to add a second
node in that mode, and without it binds every port to all interfaces).

    python examples/two_nodes.py [--cpus-per-node N] [--address-file FILE]

Prints {"address": "127.0.0.1:PORT"} as one JSON line (and writes it to --address-file), then runs until SIGTERM,
Ctrl-C or "quit" on stdin, and stops both nodes. "kill-worker" on stdin kills the worker node at once, as a lost
machine dies (tests/test_cluster.py).
"""
import argparse
import json
import os
import signal
import sys
import threading

# Ray's single-node networking: every node's address is 127.0.0.1 and its servers listen there only. Read when ray
# is imported; a driver that joins the cluster needs it too (igcam sets it for a loopback address).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

from ray.cluster_utils import Cluster  # noqa: E402  (after the environment it reads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--address-file", help="also write the JSON line here (for scripts)")
    args = parser.parse_args()
    stop = threading.Event()
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": args.cpus_per_node, "node_ip_address": "127.0.0.1",
                                      "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=args.cpus_per_node, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        # after the nodes: Ray's node installs a SIGTERM handler of its own that drains and exits with status 1
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        line = json.dumps({"address": cluster.address})
        if args.address_file:
            with open(args.address_file + ".part", "w") as f:
                f.write(line + "\n")
            os.replace(args.address_file + ".part", args.address_file)
        print(line, flush=True)

        def commands():  # stdin's end (a background job's) leaves the cluster running until a signal
            nonlocal worker
            for command in sys.stdin:
                if command.strip() == "kill-worker" and worker is not None:
                    cluster.remove_node(worker, allow_graceful=False)
                    worker = None
                    print("killed", flush=True)
                elif command.strip() == "quit":
                    stop.set()

        threading.Thread(target=commands, daemon=True).start()
        stop.wait()
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
