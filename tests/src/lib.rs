//! The multi-node rig (being written).
