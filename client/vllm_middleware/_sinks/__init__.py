"""Where records go once encoded: the shipper (a bounded buffer and its thread), the Redis
stream sink and its disk spool, the embedded file sink and its writer process, and the choice
between them (`_destination`). The rest of the client sees `Shipper` and `Destination` only."""
