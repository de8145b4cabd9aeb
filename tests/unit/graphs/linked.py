"""The seed's pruning case: Entry.link(Middle).link(Leaf) drops Middle → Router."""

from tests.unit.graphs.shapes import Entry, Leaf, Middle

Entry.link(Middle).link(Leaf)
