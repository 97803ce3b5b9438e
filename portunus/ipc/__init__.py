"""Everything that crosses a process boundary: frames, channel ends, messages.

A leaf package: every process (supervisor, shard, control, web, edge link) imports
it, and it imports none of them, so the wire format has one home and no process
pulls in another's code to speak it.
"""
