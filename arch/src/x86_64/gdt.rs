//! TODO(arch helper): see the brief.
