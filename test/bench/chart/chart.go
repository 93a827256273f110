// Package chart draws the results of the load balancer comparison as a PNG
// of small horizontal bar charts, one bar per balancer, for the README.
//
// The output depends only on the input: the same heading, panels and width
// always give the same bytes, so tests can compare images.
package chart

import (
	"bytes"
	"errors"
	"fmt"
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"math"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/image/font"
	"golang.org/x/image/font/gofont/gobold"
	"golang.org/x/image/font/gofont/goregular"
	"golang.org/x/image/font/opentype"
	"golang.org/x/image/math/fixed"
)

// A Panel is one small horizontal bar chart: one bar per balancer.
type Panel struct {
	Title    string  // e.g. "WebSocket connections/s (ratio to direct)"
	Unit     string  // printed after each value, e.g. "x" or " Mpps"
	Bars     []Bar   // one per balancer, drawn top to bottom
	Ref      float64 // if > 0, a vertical dashed line at this value, labelled with RefLabel
	RefLabel string  // label of the Ref line, e.g. "direct"
}

// A Bar is one row of a Panel.
type Bar struct {
	Label     string     // balancer name, e.g. "tether (XDP)"
	Value     float64    // length of the bar; 0 with a Note means "does not apply"
	Err       [2]float64 // optional min and max (spread) drawn as a whisker; zero means none
	Highlight bool       // draw the bar in HighlightColor instead of BarColor
	Note      string     // optional text after the value, e.g. "n/a"
}

// Colours used for the bars; exported so that tests can find the bars.
var (
	BarColor       = color.RGBA{0x8f, 0xa3, 0xbf, 0xff} // other balancers: slate blue
	HighlightColor = color.RGBA{0xe3, 0x5d, 0x25, 0xff} // tether: orange
)

var (
	background = color.RGBA{0xff, 0xff, 0xff, 0xff}
	textColor  = color.RGBA{0x1f, 0x23, 0x28, 0xff}
	mutedColor = color.RGBA{0x6a, 0x73, 0x7d, 0xff}
	axisColor  = color.RGBA{0x9a, 0xa0, 0xa6, 0xff}
	whiskColor = color.RGBA{0x24, 0x29, 0x2e, 0xff}
	refColor   = color.RGBA{0x44, 0x4d, 0x56, 0xff}
	ruleColor  = color.RGBA{0xd0, 0xd7, 0xde, 0xff}
)

// Layout in pixels.
const (
	margin      = 16 // around the whole image
	colGap      = 28 // between the two columns of the grid
	panelGap    = 22 // between panels stacked vertically
	headingGap  = 14 // below the heading rule
	titleGap    = 8  // below a panel title
	rowHeight   = 22 // one bar row
	barHeight   = 14 // the bar inside its row
	labelPad    = 10 // between the label column and the bars
	valuePad    = 6  // between the end of a bar (or whisker) and its value
	refLabelGap = 4  // above the Ref label
	minBarArea  = 40 // the bars get at least this much width
	minWidth    = 200
)

// Font sizes in pixels (DPI 72).
const (
	headingSize = 20
	titleSize   = 15
	textSize    = 13
	smallSize   = 11
)

var parsedFonts = sync.OnceValues(func() ([2]*opentype.Font, error) {
	var fs [2]*opentype.Font
	var err error
	if fs[0], err = opentype.Parse(goregular.TTF); err != nil {
		return fs, err
	}
	fs[1], err = opentype.Parse(gobold.TTF)
	return fs, err
})

// faces holds the faces of one Render call (faces are not safe for
// concurrent use, so each call makes its own).
type faces struct {
	heading, title, text, small font.Face
}

func newFaces() (*faces, error) {
	fs, err := parsedFonts()
	if err != nil {
		return nil, fmt.Errorf("chart: parse font: %w", err)
	}
	mk := func(f *opentype.Font, size float64) (font.Face, error) {
		return opentype.NewFace(f, &opentype.FaceOptions{Size: size, DPI: 72, Hinting: font.HintingFull})
	}
	var fc faces
	for _, x := range []struct {
		dst  *font.Face
		f    *opentype.Font
		size float64
	}{
		{&fc.heading, fs[1], headingSize},
		{&fc.title, fs[1], titleSize},
		{&fc.text, fs[0], textSize},
		{&fc.small, fs[0], smallSize},
	} {
		if *x.dst, err = mk(x.f, x.size); err != nil {
			return nil, fmt.Errorf("chart: font face: %w", err)
		}
	}
	return &fc, nil
}

func (fc *faces) close() {
	for _, f := range []font.Face{fc.heading, fc.title, fc.text, fc.small} {
		if f != nil {
			f.Close()
		}
	}
}

// lineHeight is the height of a line of text in face f, rounded up.
func lineHeight(f font.Face) int {
	m := f.Metrics()
	return (m.Ascent + m.Descent).Ceil()
}

func textWidth(f font.Face, s string) int {
	return font.MeasureString(f, s).Ceil()
}

// fit shortens s with an ellipsis so that it is at most w pixels wide.
func fit(f font.Face, s string, w int) string {
	if textWidth(f, s) <= w {
		return s
	}
	r := []rune(s)
	for len(r) > 0 {
		r = r[:len(r)-1]
		t := strings.TrimRight(string(r), " ") + "…"
		if textWidth(f, t) <= w {
			return t
		}
	}
	return ""
}

// Render draws the panels under a heading line, stacked vertically, or in a
// grid of two columns if there are more than three, into a PNG of the given
// width and returns the encoded bytes. The height follows from the content.
func Render(heading string, panels []Panel, width int) ([]byte, error) {
	if len(panels) == 0 {
		return nil, errors.New("chart: no panels")
	}
	if width < minWidth {
		return nil, fmt.Errorf("chart: width %d is less than %d", width, minWidth)
	}
	for i, p := range panels {
		if len(p.Bars) == 0 {
			return nil, fmt.Errorf("chart: panel %d (%q) has no bars", i, p.Title)
		}
		if !finite(p.Ref) || p.Ref < 0 {
			return nil, fmt.Errorf("chart: panel %d (%q): bad Ref %v", i, p.Title, p.Ref)
		}
		for _, b := range p.Bars {
			if !finite(b.Value) || !finite(b.Err[0]) || !finite(b.Err[1]) {
				return nil, fmt.Errorf("chart: panel %d (%q), bar %q: value is not finite", i, p.Title, b.Label)
			}
			if b.Value < 0 || b.Err[0] < 0 || b.Err[1] < 0 {
				return nil, fmt.Errorf("chart: panel %d (%q), bar %q: negative value", i, p.Title, b.Label)
			}
		}
	}

	fc, err := newFaces()
	if err != nil {
		return nil, err
	}
	defer fc.close()

	cols := 1
	if len(panels) > 3 {
		cols = 2
	}
	panelW := (width - 2*margin - (cols-1)*colGap) / cols

	// One label column width for all panels, so that bars line up.
	labelW := 0
	for _, p := range panels {
		for _, b := range p.Bars {
			labelW = max(labelW, textWidth(fc.text, b.Label))
		}
	}
	labelW = min(labelW, panelW*2/5)

	headingH := lineHeight(fc.heading)
	top := margin + headingH + 6 + headingGap

	// Heights of the grid rows.
	var rowsH []int
	for i := 0; i < len(panels); i += cols {
		h := 0
		for j := i; j < i+cols && j < len(panels); j++ {
			h = max(h, panelHeight(fc, panels[j]))
		}
		rowsH = append(rowsH, h)
	}
	height := top + margin
	for i, h := range rowsH {
		if i > 0 {
			height += panelGap
		}
		height += h
	}

	img := image.NewRGBA(image.Rect(0, 0, width, height))
	draw.Draw(img, img.Bounds(), image.NewUniform(background), image.Point{}, draw.Src)

	// Heading and a thin rule under it.
	drawText(img, fc.heading, textColor, margin, margin+fc.heading.Metrics().Ascent.Ceil(),
		fit(fc.heading, heading, width-2*margin))
	fillRect(img, image.Rect(margin, margin+headingH+6, width-margin, margin+headingH+7), ruleColor)

	y := top
	for r, h := range rowsH {
		for c := 0; c < cols; c++ {
			i := r*cols + c
			if i >= len(panels) {
				break
			}
			x := margin + c*(panelW+colGap)
			drawPanel(img, fc, panels[i], image.Rect(x, y, x+panelW, y+h), labelW)
		}
		y += h + panelGap
	}

	var buf bytes.Buffer
	if err := png.Encode(&buf, img); err != nil {
		return nil, fmt.Errorf("chart: encode: %w", err)
	}
	return buf.Bytes(), nil
}

func finite(v float64) bool { return !math.IsNaN(v) && !math.IsInf(v, 0) }

func panelHeight(fc *faces, p Panel) int {
	h := lineHeight(fc.title) + titleGap + len(p.Bars)*rowHeight
	if p.Ref > 0 {
		h += refLabelGap + lineHeight(fc.small)
	}
	return h
}

// valueText returns the value part and the note part printed after a bar.
func valueText(p Panel, b Bar) (value, note string) {
	if b.Value == 0 && b.Note != "" {
		return "", b.Note
	}
	return FormatValue(b.Value) + p.Unit, b.Note
}

// noteSep separates the value from the note.
const noteSep = "  "

func valueWidth(fc *faces, p Panel, b Bar) int {
	v, n := valueText(p, b)
	w := textWidth(fc.text, v)
	if n != "" {
		if v != "" {
			w += textWidth(fc.text, noteSep)
		}
		w += textWidth(fc.text, n)
	}
	return w
}

func drawPanel(img *image.RGBA, fc *faces, p Panel, r image.Rectangle, labelW int) {
	titleH := lineHeight(fc.title)
	drawText(img, fc.title, textColor, r.Min.X, r.Min.Y+fc.title.Metrics().Ascent.Ceil(),
		fit(fc.title, p.Title, r.Dx()))

	// Horizontal layout: labels | bars | room for the longest value text.
	textW := 0
	for _, b := range p.Bars {
		textW = max(textW, valueWidth(fc, p, b))
	}
	x0 := r.Min.X + labelW + labelPad // where 0 is
	barW := r.Max.X - x0 - valuePad - textW
	barW = max(barW, minBarArea)

	maxV := p.Ref
	for _, b := range p.Bars {
		maxV = max(maxV, b.Value, b.Err[0], b.Err[1])
	}
	if maxV <= 0 {
		maxV = 1
	}
	xOf := func(v float64) int { return x0 + int(math.Round(v/maxV*float64(barW))) }

	barsTop := r.Min.Y + titleH + titleGap
	barsBottom := barsTop + len(p.Bars)*rowHeight
	textAscent := fc.text.Metrics().Ascent.Ceil()
	textH := lineHeight(fc.text)

	type valueAt struct {
		b                Bar
		x, top, baseline int
	}
	var texts []valueAt
	for i, b := range p.Bars {
		rowTop := barsTop + i*rowHeight
		mid := rowTop + rowHeight/2
		by := rowTop + (rowHeight-barHeight)/2
		baseline := rowTop + (rowHeight-textH)/2 + textAscent

		// Label, right-aligned against the bars.
		lbl := fit(fc.text, b.Label, labelW)
		drawText(img, fc.text, textColor, x0-labelPad-textWidth(fc.text, lbl), baseline, lbl)

		end := x0
		if b.Value > 0 {
			c := BarColor
			if b.Highlight {
				c = HighlightColor
			}
			end = max(xOf(b.Value), x0+1) // a positive value shows
			fillRect(img, image.Rect(x0, by, end, by+barHeight), c)
		}
		if b.Err != [2]float64{} {
			lo, hi := xOf(min(b.Err[0], b.Err[1])), xOf(max(b.Err[0], b.Err[1]))
			fillRect(img, image.Rect(lo, mid, hi+1, mid+1), whiskColor)
			fillRect(img, image.Rect(lo, mid-4, lo+1, mid+5), whiskColor)
			fillRect(img, image.Rect(hi, mid-4, hi+1, mid+5), whiskColor)
			end = max(end, hi+1)
		}

		// The value is drawn after the Ref line, on a white box so that
		// the line does not run through it.
		texts = append(texts, valueAt{b, end + valuePad, rowTop, baseline})
	}

	// Zero axis.
	fillRect(img, image.Rect(x0-1, barsTop, x0, barsBottom), axisColor)

	if p.Ref > 0 {
		rx := xOf(p.Ref)
		for y := barsTop - 2; y < barsBottom+2; y += 7 {
			fillRect(img, image.Rect(rx, y, rx+1, min(y+4, barsBottom+2)), refColor)
		}
		lbl := p.RefLabel
		if lbl == "" {
			lbl = FormatValue(p.Ref) + p.Unit
		} else {
			lbl += " = " + FormatValue(p.Ref) + p.Unit
		}
		w := textWidth(fc.small, lbl)
		lx := rx - w/2
		lx = max(lx, x0)
		lx = min(lx, r.Max.X-w)
		drawText(img, fc.small, refColor, lx,
			barsBottom+2+refLabelGap+fc.small.Metrics().Ascent.Ceil(), lbl)
	}

	for _, t := range texts {
		v, n := valueText(p, t.b)
		w := valueWidth(fc, p, t.b)
		fillRect(img, image.Rect(t.x-2, t.top+1, t.x+w+2, t.top+rowHeight-1), background)
		tx := t.x
		if v != "" {
			tx = drawText(img, fc.text, textColor, tx, t.baseline, v)
			if n != "" {
				tx = drawText(img, fc.text, textColor, tx, t.baseline, noteSep)
			}
		}
		if n != "" {
			drawText(img, fc.text, mutedColor, tx, t.baseline, n)
		}
	}
}

// drawText draws s with its baseline at y, starting at x, and returns the x
// after the text.
func drawText(img *image.RGBA, f font.Face, c color.Color, x, y int, s string) int {
	d := font.Drawer{Dst: img, Src: image.NewUniform(c), Face: f, Dot: fixed.P(x, y)}
	d.DrawString(s)
	return d.Dot.X.Ceil()
}

func fillRect(img *image.RGBA, r image.Rectangle, c color.Color) {
	draw.Draw(img, r, image.NewUniform(c), image.Point{}, draw.Src)
}

// FormatValue formats v with 3 significant digits, without exponent:
// 0.0123, 0.123, 1.23, 12.3, 123, 1,230, 12,300.
func FormatValue(v float64) string {
	if v == 0 || !finite(v) {
		return strconv.FormatFloat(v, 'f', -1, 64)
	}
	// Round to 3 significant digits first, so that 9.996 becomes 10.0
	// and not 10.00.
	e := strconv.FormatFloat(v, 'e', 2, 64) // e.g. "-1.23e+04"
	i := strings.IndexByte(e, 'e')
	r, err1 := strconv.ParseFloat(e, 64)
	exp, err2 := strconv.Atoi(e[i+1:])
	if err1 != nil || err2 != nil {
		return e
	}
	if dec := 2 - exp; dec > 0 {
		return strconv.FormatFloat(r, 'f', dec, 64)
	}
	s := strconv.FormatFloat(r, 'f', 0, 64)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	if neg {
		b.WriteByte('-')
	}
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}
