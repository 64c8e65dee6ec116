"""Where records go once encoded, and how they wait on the way.

`Shipper` (`_shipping`): the bounded buffer the request path submits to, and the thread that
drains it; it holds one sink (`_sink.Sink`: ship a batch, report counts, close):
- `FileSink` (`_file_sink`): the embedded files, through a writer process (`_process_writer`,
  `_writer_main`) or a thread;
- `RedisStreamSink` (`_redis_sink`): the stream, one atomic script call per batch, the drop
  and sampled-out counts with it;
- `SpoolingSink` (`_spooling_sink`): a Redis sink wrapped with the disk spool (`_spool`) for
  outages, its replay and the health probe (the `_sink.Backlog` capability).
`_destination` builds them from a client's settings (`redis_shipper`, `file_shipper`) and
shares them between clients; the rest of the client sees `Shipper` and `Destination` only.
"""
