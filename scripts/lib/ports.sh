#!/usr/bin/env bash
# Sourced by the scripts that start listeners (demo.sh, test-systemd.sh, benches/scale.sh).
#
# free_port: a port of 127.0.0.1 that binds right now, picked at random below the kernel's
# ephemeral range (ip_local_port_range, 32768–60999 by default). A port from bind(0) comes from
# that range, which is also where every outgoing connection takes its local port, so by the
# time mosquitto or ferryctl binds it, an agent's connection may hold it (that failed a CI run).
free_port() {
    python3 -c '
import random, socket
for _ in range(1000):
    p = random.randrange(20000, 32000)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        continue
    finally:
        s.close()
    print(p)
    break
else:
    raise SystemExit("no free port in 20000..32000")'
}
