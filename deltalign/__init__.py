"""deltalign: RLHF where every stage trains only delta parameters on one frozen backbone."""
