"""moto servers for the load test: SQS made safe for concurrent deletes, DynamoDB on its own.

moto 5.2's ``Queue.delete_message`` rebuilds the queue's message list without the lock that
``add_message`` takes, so a message sent while another is being deleted can vanish, and of two
deletes running at once one can be undone (the message stays in flight until its visibility
runs out). Three workers deleting while a feeder sends hit both within a 2,000-message run
(observed: four deleted messages back in flight). Real SQS does neither. ``LockedMotoServer``
starts moto with that one method run under the queue's own lock; everything else is moto's.

moto also serves one request at a time per service in effect (the GIL): DynamoDB's two
UpdateItem calls per object cost as much CPU as everything else in moto together, so the load
test gives DynamoDB a server of its own and the two can use both cores.
"""
from __future__ import annotations

import subprocess
import sys

from tools.local_cloud import LOOPBACK, MotoServer

# moto.server with Queue.delete_message under the queue's lock; like LocalCloud's servers it
# stops itself once its stdin closes (the process that started it is gone, even by SIGKILL).
_LOCKED_SQS = """\
import os, signal, sys, threading
from moto.sqs import models

_delete_message = models.Queue.delete_message


def delete_message(self, receipt_handle):
    with self._messages_lock:
        _delete_message(self, receipt_handle)


def stop_when_parent_is_gone():
    sys.stdin.buffer.read()
    os.kill(os.getpid(), signal.SIGTERM)


models.Queue.delete_message = delete_message
threading.Thread(target=stop_when_parent_is_gone, daemon=True).start()
from moto.server import main
main(sys.argv[1:])
"""


class LockedMotoServer(MotoServer):
    """A moto server whose SQS deletes cannot lose a concurrent send or delete."""

    def _spawn(self, port: int) -> None:
        command = [sys.executable, "-c", _LOCKED_SQS, "-H", LOOPBACK, "-p", str(port)]
        output = subprocess.DEVNULL
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            output = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=output,
                                          stderr=subprocess.STDOUT)
        finally:
            if output is not subprocess.DEVNULL:
                output.close()
        self.port = port


def create_table_like(cloud, dynamodb) -> None:
    """The worker's DynamoDB table, as LocalCloud creates it, on another server."""
    dynamodb.create_table(TableName=cloud.table_name, BillingMode="PAY_PER_REQUEST",
                          AttributeDefinitions=[{"AttributeName": "Key", "AttributeType": "S"}],
                          KeySchema=[{"AttributeName": "Key", "KeyType": "HASH"}])
