#!/bin/bash
# bench/setup.sh: install the benchmark anchors (mosquitto broker and clients)
# from Debian packages when they are missing.  The system mosquitto service is
# never started: the benchmarks run their own broker on 127.0.0.1.
set -euo pipefail

if command -v mosquitto_pub >/dev/null && command -v mosquitto_sub >/dev/null \
    && [[ -x /usr/sbin/mosquitto ]]; then
  exit 0
fi

sudo=()
[[ $(id -u) -ne 0 ]] && sudo=(sudo)

# policy-rc.d exit 101 tells invoke-rc.d not to start the service the package
# installs; only add one (and remove it afterwards) when none is there.
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
  "${sudo[@]}" sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
  trap '"${sudo[@]}" rm -f "$policy"' EXIT
fi

export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update
"${sudo[@]}" apt-get install -y --no-install-recommends mosquitto mosquitto-clients
