# MirrorUnit front panel: what the screen shows and what the four buttons do.
# A state machine with no I/O: buttons, frames and the clock go in; frames to send
# and the lines to draw come out (app.py does the I/O).  Runs on the Unix port as is.

import proto

UP = "up"
DOWN = "down"
SELECT = "select"
BACK = "back"

#: Screens longer than the display show a page of it at a time, turning every PAGE_MS
#: (up/down turn them by hand; back on the home screen goes to its first page).
PAGE_MS = 2500
#: How long the panel waits for the answer to an action (the appliance checks the
#: admin password with scrypt and may apply a network change).
REQUEST_TIMEOUT_MS = 15000

MAIN_MENU = (
    ("Network", "net"),
    ("Fingerprint", "fingerprint"),
    ("Standby", "standby"),
    ("Promote", "promote"),
    ("Switchover", "switchover"),
    ("Shutdown", "shutdown"),
    ("About", "about"),
)
NET_MENU = (("DHCP", "dhcp"), ("Static address", "static"))
#: Actions that change the unit: each asks to confirm, then for the admin password.
CONFIRM = {
    "standby": "Standby volume?",
    "promote": "Promote volume?",
    "switchover": "Switch over?",
    "shutdown": "Shut down?",
    "dhcp": "Use DHCP?",
    "static": "Use address?",
}
#: Characters the password entry cycles through; "OK" in front ends the entry.
PIN_CHARS = ("0123456789abcdefghijklmnopqrstuvwxyz"
             "ABCDEFGHIJKLMNOPQRSTUVWXYZ-_.,:;!?@#$%&*+=/")
OK_MARK = "[OK]"
MAX_PIN = 64
ADDRESS_TEMPLATE = "192.168.001.010/24"


def wrap(text, width):
    out = []
    for word in str(text).split(" "):
        while len(word) > width:
            if out and len(out[-1]) < width - 1:
                room = width - len(out[-1]) - 1
                out[-1] += " " + word[:room]
                word = word[room:]
            else:
                out.append(word[:width])
                word = word[width:]
        if not word:
            continue
        if out and len(out[-1]) + 1 + len(word) <= width:
            out[-1] += " " + word
        else:
            out.append(word)
    return out


def _digit_positions(template):
    return [i for i, c in enumerate(template) if "0" <= c <= "9"]


class Panel:
    def __init__(self, cols=16, rows=8, version="?", invert=True):
        self.cols = cols
        self.rows = rows
        self.version = version
        #: the display can draw a row inverted (an OLED); else (a character LCD) the
        #: selected menu line is marked with '>'
        self.invert = invert
        #: two or three rows (a 16x2 LCD): menus without their title, short forms
        self.compact = rows < 4
        self.page = 0
        self.page_at = None
        self.status = None
        self.link_up = False
        self.screen = "home"
        self.sel = 0
        self.action = None
        self.args = None
        self.pin = ""
        self.pin_index = 1
        self.address = ADDRESS_TEMPLATE
        self.addr_pos = 0
        self.pending = None  # (request id, sent at)
        self.next_id = 1
        self.result = []
        self.dirty = True

    # ------------------------------------------------------------ from the link

    def on_status(self, st):
        self.status = st
        self.dirty = True

    def on_link(self, up):
        if up != self.link_up:
            self.link_up = up
            self.dirty = True

    def on_peer_restart(self):
        """The appliance came back with a new boot id: an answer will not come."""
        if self.pending is not None:
            self.pending = None
            self._show_result(["Unit restarted:", "try again"])

    def on_reply(self, reply):
        if self.pending is None or reply.get("id") != self.pending[0]:
            return  # late answer to a request given up on
        self.pending = None
        lines = []
        data = reply.get("data")
        if reply.get("ok"):
            if isinstance(data, list):
                lines = [str(x) for x in data]
            else:
                lines = wrap(reply.get("msg") or "Done.", self.cols)
        else:
            lines = ["Refused:"] + wrap(reply.get("msg") or "?", self.cols)
        self._show_result(lines)

    def tick(self, now, ticks_diff):
        if self.page_at is None:
            self.page_at = now
        elif ticks_diff(now, self.page_at) >= PAGE_MS:
            self.page_at = now
            if self._pages() > 1:
                self.page += 1
                self.dirty = True
        if self.pending is not None and ticks_diff(now, self.pending[1]) > REQUEST_TIMEOUT_MS:
            self.pending = None
            self._show_result(["No answer from", "the unit"])

    # ------------------------------------------------------------ buttons

    def press(self, button, now):
        """One button press; returns the frames to send as [(type, object)]."""
        self.dirty = True
        before = self.screen
        handler = getattr(self, "_press_" + self.screen)
        out = handler(button, now) or []
        if self.screen != before:
            self.page = 0
            self.page_at = now
        return out

    def _turn_page(self, b, now):
        if b in (UP, DOWN):
            self.page += 1 if b == DOWN else self._pages() - 1
            self.page_at = now

    def _press_home(self, b, now):
        self._turn_page(b, now)
        if b == SELECT:
            self.screen = "menu"
            self.sel = 0
        elif b == BACK:
            self.page = 0
            self.page_at = now

    def _menu_move(self, b, items):
        if b == UP:
            self.sel = (self.sel - 1) % len(items)
        elif b == DOWN:
            self.sel = (self.sel + 1) % len(items)

    def _press_menu(self, b, now):
        self._menu_move(b, MAIN_MENU)
        if b == BACK:
            self.screen = "home"
        elif b == SELECT:
            what = MAIN_MENU[self.sel][1]
            if what == "net":
                self.screen = "net"
                self.sel = 0
            elif what == "about":
                self.screen = "about"
            elif what == "fingerprint":
                return self._send("fingerprint", {}, None, now)
            else:
                self._ask(what, {})

    def _press_net(self, b, now):
        self._menu_move(b, NET_MENU)
        if b == BACK:
            self.screen = "menu"
            self.sel = 0
        elif b == SELECT:
            what = NET_MENU[self.sel][1]
            if what == "dhcp":
                self._ask("dhcp", {"mode": "dhcp"})
            else:
                self.screen = "address"
                self.addr_pos = 0

    def _press_address(self, b, now):
        positions = _digit_positions(self.address)
        i = positions[self.addr_pos]
        if b in (UP, DOWN):
            d = (int(self.address[i]) + (1 if b == UP else -1)) % 10
            self.address = self.address[:i] + str(d) + self.address[i + 1:]
        elif b == SELECT:
            if self.addr_pos + 1 < len(positions):
                self.addr_pos += 1
            else:
                ip, prefix = self.address.split("/")
                ip = ".".join(str(int(o)) for o in ip.split("."))
                self._ask("static", {"mode": "static", "address": ip,
                                     "prefix": int(prefix)})
        elif b == BACK:
            if self.addr_pos > 0:
                self.addr_pos -= 1
            else:
                self.screen = "net"

    def _ask(self, action, args):
        self.action = action
        self.args = args
        self.screen = "confirm"

    def _press_confirm(self, b, now):
        if b == SELECT:
            self.screen = "pin"
            self.pin = ""
            self.pin_index = 1
        elif b == BACK:
            self._show_result(["Cancelled:", "nothing changed"])

    def _press_pin(self, b, now):
        n = len(PIN_CHARS) + 1  # index 0 is OK
        if b == UP:
            self.pin_index = (self.pin_index + 1) % n
        elif b == DOWN:
            self.pin_index = (self.pin_index - 1) % n
        elif b == BACK:
            if self.pin:
                self.pin = self.pin[:-1]
            else:
                self._show_result(["Cancelled:", "nothing changed"])
        elif b == SELECT:
            if self.pin_index == 0:
                pin = self.pin
                self.pin = ""
                op = "network" if self.action in ("dhcp", "static") else self.action
                return self._send(op, self.args or {}, pin, now)
            if len(self.pin) < MAX_PIN:
                self.pin += PIN_CHARS[self.pin_index - 1]
            self.pin_index = 1

    def _send(self, op, args, pin, now):
        rid = self.next_id
        self.next_id = self.next_id % 1000000 + 1
        req = {"id": rid, "op": op, "args": args}
        if pin is not None:
            req["pin"] = pin
        self.pending = (rid, now)
        self.screen = "wait"
        return [(proto.REQUEST, req)]

    def _press_wait(self, b, now):
        pass  # the answer or the timeout ends it

    def _show_result(self, lines):
        self.result = lines
        self.screen = "result"
        self.page = 0
        self.page_at = None
        self.dirty = True

    def _press_result(self, b, now):
        self._turn_page(b, now)
        if b in (SELECT, BACK):
            self.screen = "home"

    def _press_about(self, b, now):
        self._turn_page(b, now)
        if b in (SELECT, BACK):
            self.screen = "menu"

    # ------------------------------------------------------------ drawing

    def view(self):
        """(lines, highlighted row or -1): at most `rows` lines of at most `cols`; a
        screen with more lines than rows (and no selection) shows its current page."""
        lines, hi = getattr(self, "_view_" + self.screen)()
        if hi < 0 and len(lines) > self.rows:
            page = self.page % self._pages(lines)
            lines = lines[page * self.rows:]
        return [line[:self.cols] for line in lines[:self.rows]], hi

    def _pages(self, lines=None):
        if lines is None:
            lines, hi = getattr(self, "_view_" + self.screen)()
            if hi >= 0:
                return 1
        return (len(lines) + self.rows - 1) // self.rows

    def _view_home(self):
        st = self.status
        if st is None:
            return ["MirrorUnit", "", "waiting for", "the unit..."], -1
        fill = st.get("fill")
        lag = st.get("lag")
        lines = [
            str(st.get("name") or "MirrorUnit"),
            "%s %s" % (st.get("role", "?"), st.get("vol", "")),
            "link %s" % st.get("link", "-") + ("" if lag is None else " %.1fs" % lag),
            "cbq %s %s" % ("-" if fill is None else "%d%%" % int(fill * 100 + 0.5),
                           st.get("mode", "")),
            "ups %s" % st.get("ups", "-"),
        ]
        fault = st.get("fault")
        if self.compact:
            # the name, then at once the fault if there is one, then the rest by pages
            if not self.link_up:
                return [lines[0], "(unit silent)"], -1
            if fault:
                lines[1:1] = wrap("FAULT " + str(fault), self.cols)[:3]
            return lines, -1
        if fault:
            lines.append("FAULT")
            lines.extend(wrap(fault, self.cols)[:1])
        if not self.link_up:
            lines = lines[:self.rows - 1] + ["(unit silent)"]
        return lines, -1

    def _menu_view(self, title, items):
        head = [] if self.compact else [title]
        room = self.rows - len(head)
        top = max(0, min(self.sel - room + 1, len(items) - room))
        labels = [label for label, _ in items[top:top + room]]
        if not self.invert:
            labels = [(">" if top + i == self.sel else " ") + label
                      for i, label in enumerate(labels)]
        return head + labels, len(head) + self.sel - top

    def _view_menu(self):
        return self._menu_view("Menu", MAIN_MENU)

    def _view_net(self):
        return self._menu_view("Network", NET_MENU)

    def _view_address(self):
        # 18 characters do not fit 16 columns: the prefix goes on a line of its own
        i = _digit_positions(self.address)[self.addr_pos]
        ip, prefix = self.address.split("/")
        pre = "prefix /"
        at_ip = i < len(ip)
        if self.compact:  # the part being edited, the caret under it
            if at_ip:
                return [ip, " " * i + "^"], -1
            return [pre + prefix, " " * (len(pre) + i - len(ip) - 1) + "^"], -1
        return ["Static address", ip, " " * i + "^" if at_ip else "", pre + prefix,
                "" if at_ip else " " * (len(pre) + i - len(ip) - 1) + "^",
                "up/dn: digit", "sel: next"], -1

    def _view_confirm(self):
        q = CONFIRM.get(self.action, self.action)
        if self.compact:
            if self.action == "static":
                return [self.args["address"], "/%d sel=y back=n" % self.args["prefix"]], -1
            return [q, "sel=yes back=no"], -1
        lines = [q]
        if self.action == "static":
            lines.append("%s/%d" % (self.args["address"], self.args["prefix"]))
        return lines + ["", "sel: yes", "back: no"], -1

    def _view_pin(self):
        ch = OK_MARK if self.pin_index == 0 else PIN_CHARS[self.pin_index - 1]
        if self.compact:
            line = "Password " + "*" * len(self.pin)
            if len(line) > self.cols:  # too many to draw: how many
                line = "Password (%d)" % len(self.pin)
            return [line, "char " + ch], -1
        return ["Admin password", "*" * len(self.pin), "char " + ch, "",
                "sel add/OK", "back delete"], -1

    def _view_wait(self):
        if self.compact:
            return ["Working...", "waiting for unit"], -1
        return ["Working...", "", "(waiting for", "the unit)"], -1

    def _view_result(self):
        return self.result + ([] if self.compact else [""]) + ["sel: back"], -1

    def _view_about(self):
        st = self.status or {}
        return (["MirrorUnit", "version " + str(st.get("ver", "?"))]
                + wrap(st.get("copy", ""), self.cols)
                + ["panel " + self.version]), -1

    # ------------------------------------------------------------ LEDs

    def fault(self):
        return bool(self.status and self.status.get("fault"))
