#!/bin/sh
# Run by tini (PID 1) in the guest: keep the agent running for the life of the sandbox.
read -r t _ < /proc/uptime
echo "init $t" >> /run/smolvm-boot
while :; do
    /usr/bin/python3 -I -S -c 'import sys; sys.path.insert(0, "/opt/smolvm"); import agent; agent.main()'
    echo "smolvm: agent exited with $?, restarting" > /dev/console
    sleep 0.5
done
