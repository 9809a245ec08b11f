"""Evaluation beyond HTCL's own protocols (those are evaluate.py's): the shared metrics and embedding
I/O, similar-song search, CrossMuSim retrieval and the GraphSAGE artist graph. `python evaluate.py -h`
lists the sub-commands that run them."""
