"""What coordinator and sites say to each other beyond Flower's own records: application error codes.

Light on purpose (no torch, no Flower): the SuperLink's reply tally reads it too.
"""

from __future__ import annotations

REFUSED_CODE = 4003  # a site refused the run: its code is not approved there, or it breaks the site's policy
