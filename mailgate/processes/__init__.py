"""
Several processes for one gateway: receiver processes accept mail on both cores, the main
process queues recovery, delivery, the admin socket, logs and metrics.

The main process binds every listening socket (so ports, privileges and "address already in
use" stay where they were) without accepting on it, and starts `[gateway] workers` receiver
processes that inherit the sockets and accept.  A receiver runs the listeners and their filter
chains and writes each message to the spool itself, so the 250 still follows the fsync, in the
process that says it; it then tells the main process, which delivers.  Everything a receiver
publishes (events, log lines) reaches the main process's event bus and log over a pipe, so the
logs, trace, metrics and alerts are the gateway's, not a process's.
"""
