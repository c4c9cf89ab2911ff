"""deltalign: RLHF where every stage trains only delta parameters on one frozen backbone."""
from deltalign.core import quiet as _quiet

_quiet.install()  # before anything imports bitsandbytes (see core/quiet.py)
