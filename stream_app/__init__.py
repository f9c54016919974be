"""streamrec's streaming side: Faust app, agents, wire formats, CLI.

Import-light on purpose: building an app or a worker happens in factories, never at import.
"""
