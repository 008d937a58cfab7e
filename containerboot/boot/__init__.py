"""The boot program (a bare `containerboot`): loop.py orders the phases and the events; bus.py,
keeper.py, targets.py and prepare.py are the collaborators that live only for it."""
