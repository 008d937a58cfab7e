"""The boot program (a bare `containerboot`): main.py sets up and runs one boot after another; loop.py
orders the phases and the events of one; bus.py, keeper.py, targets.py, tailscaled_rules.py and
prepare.py are the collaborators that live only for it."""
