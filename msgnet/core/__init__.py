"""Sans-IO protocol cores: pure state machines with no sockets, tasks or clocks."""
