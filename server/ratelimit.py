"""
Token buckets for the rate limits (access.py): in this process, or in Redis so that N replicas
together allow a key its limit, not N times it. A bucket is any string or number (an API key's
id, "anon:<address>", ...); `burst` requests may go at once and the bucket refills at `rate` per
second. The Redis bucket is one Lua script, so check-and-take is atomic across replicas, and it
uses Redis's clock, so replicas' clocks do not matter.

Redis unreachable: requests are still served, limited per process (LocalBuckets), with a warning
in the log and in /metrics (shared == False); Redis is tried again every RETRY_EVERY seconds.
"""
import logging
import threading
import time

from storage import redact

log = logging.getLogger("api_server")

PREFIX = "gpt2:bucket:"
RETRY_EVERY = 2.0  # seconds between attempts to reach Redis again
TIMEOUT = 0.5  # seconds a request waits on Redis before its limit is taken locally
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'time')
local tokens = math.min(burst, (tonumber(state[1]) or burst) + (now - (tonumber(state[2]) or now)) * rate)
local allowed = 0
if tokens >= 1 then
    tokens = tokens - 1
    allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'time', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return {allowed, tostring(tokens)}
"""


class LocalBuckets:
    """This process's buckets."""
    shared = False

    PRUNE_AT = 10_000  # buckets held before the full ones are dropped (one per client address)

    def __init__(self):
        self._buckets = {}  # bucket -> (tokens, time, when it is full again)
        self._lock = threading.Lock()

    def take(self, bucket, rate, burst):
        """Take a token if there is one -> (taken, tokens left)."""
        with self._lock:
            now = time.monotonic()
            tokens, last, _ = self._buckets.get(bucket, (burst, now, now))
            tokens = min(burst, tokens + (now - last) * rate)
            taken = tokens >= 1
            left = tokens - taken
            self._buckets[bucket] = (left, now, now + (burst - left) / rate if rate > 0 else float("inf"))
            if len(self._buckets) > self.PRUNE_AT:  # a full bucket is the same as none: forget those
                self._buckets = {k: v for k, v in self._buckets.items() if v[2] > now}
            return taken, left


class RedisBuckets:
    """Buckets in Redis, shared by every replica; LocalBuckets while Redis cannot be reached."""

    def __init__(self, url):
        import redis
        self.url = redact(url)
        self.client = redis.Redis.from_url(url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
        self.script = self.client.register_script(TAKE)
        self.local = LocalBuckets()
        self.errors = 0  # failed Redis calls, for /metrics
        self.shared = True
        self._retry_at = 0.0

    def take(self, bucket, rate, burst):
        import redis
        if self.shared or time.monotonic() >= self._retry_at:
            try:
                taken, tokens = self.script(keys=[f"{PREFIX}{bucket}"], args=[rate, burst])
            except redis.RedisError as e:
                self.errors += 1
                self._retry_at = time.monotonic() + RETRY_EVERY
                if self.shared:
                    log.warning("Redis at %s is unreachable (%s): rate limits are per process until it is back",
                                self.url, e)
                self.shared = False
            else:
                if not self.shared:
                    log.warning("Redis at %s is back: rate limits are shared again", self.url)
                self.shared = True
                return bool(taken), float(tokens)
        return self.local.take(bucket, rate, burst)
