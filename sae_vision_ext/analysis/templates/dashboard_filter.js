// The filter box, the card count (<body data-cards>) and the page status (<body data-status="ok">).
(function () {
  var cards = Array.prototype.slice.call(document.querySelectorAll('.latent-card'));
  var filter = document.getElementById('filter');
  function apply() {
    var q = (filter.value || '').toLowerCase().trim();
    var shown = 0;
    cards.forEach(function (card) {
      var hit = !q || card.getAttribute('data-search').indexOf(q) !== -1;
      card.style.display = hit ? '' : 'none';
      if (hit) { shown += 1; }
    });
    document.getElementById('shown').textContent = shown + ' of ' + cards.length + ' latents';
  }
  filter.addEventListener('input', apply);
  apply();
  document.body.setAttribute('data-cards', String(cards.length));
  var errors = window.dashboardErrors || [];
  document.body.setAttribute('data-status', errors.length ? 'error: ' + errors[0] : 'ok');
})();
