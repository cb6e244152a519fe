"""The virtual microphone on a PipeWire desktop: ``rtns run -i pulse --virtual-mic NAME``
against a private headless PipeWire 0.3 (pipewire + wireplumber + pipewire-pulse under a
private session D-Bus, tests/pulse_harness.py's ``PipeWireServer``).

The server-facing tests of tests/test_vmic_pulse.py run here unchanged against PipeWire's
PulseAudio server (their ``pulse`` fixture is this module's): the recording of the virtual
microphone is rtns's own offline output of the speech played into the fake mic, the device
is gone after SIGINT and SIGTERM, a SIGKILLed rtns's leftover is removed at the next start,
another program's source is left alone, and the live metrics are served. Needs pipewire,
pipewire-pulse, wireplumber, dbus, pulseaudio-utils, libasound2-plugins and libportaudio2;
skipped with the reason otherwise.
"""

from __future__ import annotations

import pytest
from pulse_harness import PipeWireServer, pipewire_skip_reason
from test_vmic_pulse import (  # noqa: F401  (collected here, against PipeWire)
    speech,
    test_a_source_of_another_program_is_left_alone,
    test_leftover_of_a_crash_is_removed_at_the_next_start,
    test_metrics_of_the_live_path,
    test_sigterm_removes_the_virtual_mic,
    test_virtual_mic_carries_the_enhanced_speech,
)

REASON = pipewire_skip_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture(scope="module")
def pulse(tmp_path_factory):
    """PipeWire's PulseAudio server, under the name the imported tests use."""
    with PipeWireServer(tmp_path_factory.mktemp("pipewire")) as srv:
        assert "PipeWire" in srv.version(), srv.version()
        yield srv
