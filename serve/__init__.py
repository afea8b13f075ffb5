"""``loc3r-serve``: an OpenAI-compatible chat-completions server for Loc3R-VLM.

One model in one worker thread behind a bounded queue; videos stay encoded in sessions
(an LRU bounded by memory) so follow-up questions reuse their KV prefix; every answer
carries the pose. A web page at ``/`` shows the answer and the pose on a live map.
See ``docs/user-guide.md`` ("Serve").
"""
