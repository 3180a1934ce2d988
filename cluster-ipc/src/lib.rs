//! Frames with fd passing and seq/ack over Unix sockets (being built).
